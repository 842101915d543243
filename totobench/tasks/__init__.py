"""Task classes (one per task kind, registered by name) and task YAML loading."""
