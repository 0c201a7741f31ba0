"""Real logged data sets converted to the session format, with their pipelines."""
