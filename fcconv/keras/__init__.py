"""Keras models: their config rewritten as JSON (:mod:`~fcconv.keras.config`) and the
result run in Keras itself (:mod:`~fcconv.keras.check`). Files are :mod:`fcconv.io.keras`."""
