from django.apps import AppConfig


class DlqAdminConfig(AppConfig):
    name = "dlq_admin"
    verbose_name = "Dead-letter queue"

    def ready(self) -> None:
        from . import sagas_admin  # noqa: F401 - registers the saga-run admin
