"""The errors every layer raises, and how the console scripts report them.

A `UserError` is a mistake the user can fix (a wrong flag, a missing file, a model we do not
support). The command-line entry points print its message on one line and exit with status 2,
without a traceback. A `CommError` is a collective that failed (another rank died or timed out):
one line, exit status 3, at once. Anything else that escapes is a bug and keeps its traceback.

This module imports nothing of the package: every layer may import it.
"""

import json
import os
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


class CommError(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


def read_json_object(path: str, remedy: str = "") -> dict:
    """The JSON object in `path`, or a UserError naming the file, what is wrong with it and `remedy`."""
    tail = f"; {remedy}" if remedy else ""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}){tail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}){tail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object{tail}")
    return data


def exit_on_user_error(main):
    """Wrap a console-script `main` so a UserError prints one line and exits 2."""

    def wrapped(argv=None):
        try:
            return main(argv)
        except UserError as e:
            prefix = _rank_prefix()
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
            _exit(2)
        except KeyboardInterrupt:
            sys.exit(130)
        except CommError as e:
            # Another rank is gone: say so in one line and leave at once, without waiting on
            # process-group teardown, which could block on the dead peer.
            print(f"error: {e}", file=sys.stderr, flush=True)
            _exit(3, force=True)

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
    wrapped.__wrapped__ = main  # the Ray launcher runs it unwrapped, so a rank's error reaches the driver
    return wrapped


def _exit(code: int, force: bool = False):
    """Exit with `code`. Once a process group exists, leave without its teardown: the peers are
    leaving too (or are gone), and tearing gloo down under them can abort the process."""
    dist = sys.modules.get("torch.distributed")
    if force or (dist is not None and dist.is_available() and dist.is_initialized()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _rank_prefix():
    """'[rank r] ' in a job of several ranks. Only the launch glue reads the launchers' variables, and this
    module imports nothing of the package: a tool that never loaded the launch glue is a single process."""
    launch = sys.modules.get("tp_runtime.distributed.launch")
    if launch is None:
        return ""
    info = launch.detect_launch()
    return f"[rank {info.rank}] " if info.world_size > 1 else ""
