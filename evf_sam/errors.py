"""Exceptions of the evf_sam library: one type per kind of failure, each with a message a user can act on."""


class EvfError(Exception):
    """Base class of every error raised on purpose by evf_sam."""


class CheckpointError(EvfError):
    """A checkpoint cannot be found, fetched, read, or does not match the model it describes."""


class ImageError(EvfError):
    """An input image cannot be decoded or has an unusable shape or type."""


class PromptError(EvfError):
    """A text prompt is empty, too long, or otherwise unusable."""
