"""Remote pipeline configuration on the device: the signed desired state's ``config``.

``plan`` (pure) parses, validates and diffs a configuration; ``store`` keeps the accepted one
under ``DATA_DIR/config``; ``applier`` applies it to the running pipelines, watches its health
window and rolls back.
"""
