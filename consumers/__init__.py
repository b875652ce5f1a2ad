"""Stream consumers: dispatch, status, thumbnails."""
