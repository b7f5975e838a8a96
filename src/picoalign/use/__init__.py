"""Using a trained model: `picoalign generate`, `picoalign chat`, `picoalign export`."""
