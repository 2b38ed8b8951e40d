"""The library's user-facing error: a setting is wrong (a recipe key, an environment
variable, a batch that cannot be split). The application's config raises the same class."""


class ConfigError(ValueError):
    """A setting is wrong; the message is one line that names it and what to do."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))
