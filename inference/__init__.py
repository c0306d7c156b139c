"""Engines: pure image work on decoded inputs. Never imports Flask, Celery or SQLAlchemy."""
