"""The error a run stops with when too many images are unreadable: raised by the datasets (util/data.py)
and the GPU decoder (util/gpu_decode.py), caught by the training loop, which stops every rank with one line."""


class TooManyBadSamplesError(RuntimeError):
    """More than ``max_bad_fraction`` of the loaded images were unreadable, or too many in a row."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error comes back as this type with the worker's traceback in the message;
        # the run reports it as one line, so keep only the original message (the traceback's last line).
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)
