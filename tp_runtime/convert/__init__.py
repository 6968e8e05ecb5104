"""The converter: a Hugging Face checkpoint in, an engine directory out.

Imports the engine format and errors; never the runtime."""
