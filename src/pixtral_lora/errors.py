"""The errors that mean "the user asked for something impossible": commands print them in one line.

Each lives beside the code that raises it; this gathers them for the command-line entry points.
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (file, line, field, what to do)."""
    from pixtral_lora.config import ConfigError
    from pixtral_lora.data.loaders import DataError
    from pixtral_lora.export import ExportError
    from pixtral_lora.images import ImageError
    from pixtral_lora.io import OutputError
    from pixtral_lora.modeling import ModelSourceError
    from pixtral_lora.render import RenderError
    from pixtral_lora.rundir import RunDirError

    return (
        ConfigError,
        DataError,
        ExportError,
        ImageError,
        OutputError,
        ModelSourceError,
        RenderError,
        RunDirError,
        FileNotFoundError,
    )
