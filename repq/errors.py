"""The one exception type for problems a user can fix (bad path, mismatched checkpoint, unknown key).

Its message is one line that names the problem and the fix; the CLI prints it without a traceback.
"""


class RepqError(Exception):
    pass
