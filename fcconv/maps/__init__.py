"""Pictures of dense maps: a dense model run on an image, each cell drawn on its input box.

:mod:`~fcconv.maps.program` loads the model and the coordinate map it
carries, :mod:`~fcconv.maps.image` reads the image, :mod:`~fcconv.maps.grid`
lays the cells on it, :mod:`~fcconv.maps.draw` draws them (matplotlib). The
job is :func:`fcconv.api.map_image`.
"""
