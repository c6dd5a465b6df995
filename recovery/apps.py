from django.apps import AppConfig


class RecoveryConfig(AppConfig):
    name = "recovery"
    verbose_name = "Task recovery"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
        from .workflows import sagas  # noqa: F401 - records when saga steps start (task_prerun)
        from .observe import sentry

        sentry.install()  # drops the Celery integration's second event of a parked task
