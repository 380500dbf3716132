"""The one error type users see: a bad environment or a refused configuration (exit code 2)."""


class UserError(Exception):
    """Bad input. `problems` are complete sentences, each naming the variable (or file) at fault."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)
