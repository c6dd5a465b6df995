from django.apps import AppConfig


class DlqAdminConfig(AppConfig):
    name = "dlq_admin"
    verbose_name = "Dead-letter queue"

    def ready(self) -> None:
        from django.contrib import admin

        from . import incidents_admin  # noqa: F401 - registers the incident admin
        from . import sagas_admin  # noqa: F401 - registers the saga-run admin
        from .views import install

        install(admin.site)  # the on-call dashboard at /admin/recovery/dashboard/
