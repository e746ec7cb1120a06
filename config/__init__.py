"""Settings, logging and provider presets: everything a process reads once at start-up."""
