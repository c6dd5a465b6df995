"""The chaos suite (see test_chaos.py)."""

#: The scripted task's name. Defined here so the test process need not import the task
#: module (and register the task in the project's app for every other test).
TASK_NAME = "chaos.scripted"
