"""Configuration: the typed settings object and logging set-up."""

from config.settings import QUEUES, Settings, SettingsError

__all__ = ["QUEUES", "Settings", "SettingsError"]
