"""Configuration: the typed settings object and logging set-up."""

from config.settings import QUEUES, REQUEST_LINE_LIMIT, Settings, SettingsError

__all__ = ["QUEUES", "REQUEST_LINE_LIMIT", "Settings", "SettingsError"]
