from django.apps import AppConfig


class ResizerConfig(AppConfig):
    name = "resizer"
