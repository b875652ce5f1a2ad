"""gengui core: settings, logging, database, lifecycle, streams, storage, API and CLI."""
