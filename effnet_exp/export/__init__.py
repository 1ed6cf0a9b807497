"""mode=export: frozen GraphDef, SavedModel and export.json (with ATC command lines) from a checkpoint."""
