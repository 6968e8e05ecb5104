"""The engine directory's format (config.json, rank files): what the converter writes and the runtime reads."""
