"""How the command-line tools report input a user must fix: one message and exit code 2."""

import os
import sys
from typing import Callable, Tuple, Type

TRACEBACK_VARIABLE = "LLMSCALE_TRACEBACK"


def exit_code_of(command: Callable[[], None], user_errors: Tuple[Type[BaseException], ...]) -> int:
    """Run `command`; an error of `user_errors` (a missing file, a bad value) is printed as one
    line and gives 2, unless LLMSCALE_TRACEBACK=1 asks for the traceback. Other errors are bugs
    and keep theirs."""
    try:
        command()
    except user_errors as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"error: {error}\n(set {TRACEBACK_VARIABLE}=1 for the traceback)", file=sys.stderr)
        return 2
    return 0
