"""The one error type qconvert raises for user mistakes and bad inputs.

The CLI prints ``error: <message>`` on one line and exits non-zero; messages say what went wrong,
where, and how to fix it.
"""


class QConvertError(Exception):
    """A user-facing error: bad input file, refused overwrite, unsupported model, ..."""
