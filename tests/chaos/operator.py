"""``manage.py`` with the chaos suite's task registered, as the operator's deployment
would have it: ``python -m tests.chaos.operator dlq replay ...``."""

import sys

import django
from django.core.management import execute_from_command_line

if __name__ == "__main__":
    django.setup()
    import tests.chaos.chaos_tasks  # noqa: F401 - registers chaos.scripted for replay

    execute_from_command_line(["manage.py", *sys.argv[1:]])
