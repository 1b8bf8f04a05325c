"""The one exception type whose message is shown to users as a one-line error."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what is wrong and what to do."""
