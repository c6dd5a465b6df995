from django.apps import AppConfig


class DlqAdminConfig(AppConfig):
    name = "dlq_admin"
    verbose_name = "Dead-letter queue"
