"""The one exception type that corpus loading raises for problems a user can fix."""


class CorpusError(Exception):
    """A corpus could not be loaded: missing or corrupted files, bad text, unknown tokens.

    The message is always one line that names the file (or folder, or setting) at fault
    and, where there is one, the fix.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


class VocabularyMismatch(CorpusError):
    """Two vocabularies differ (e.g. a checkpoint's and the corpus's)."""
