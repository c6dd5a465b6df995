from django.apps import AppConfig


class RecoveryConfig(AppConfig):
    name = "recovery"
    verbose_name = "Task recovery"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The composition root: imported here, once the models are loaded, as Django
        # documents for checks and signal receivers.
        from . import checks  # noqa: F401 - registers the system checks
        from . import subscriptions
        from .observe import sentry
        from .workflows import sagas  # noqa: F401 - records when saga steps start (task_prerun)

        subscriptions.connect()
        sentry.install()  # drops the Celery integration's second event of a parked task
