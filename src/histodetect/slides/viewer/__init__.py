"""What the slide viewer needs from the slides layer: Deep Zoom tiles and the slide catalogue.

``tiles`` makes Deep Zoom tiles of a slide (OpenSlide's ``DeepZoomGenerator``, over the
project's own reader for files OpenSlide cannot open) and of a stored map (probability colours
or the tissue mask as PNG with alpha, from ``prob.npy``/``tissue.png``, no model needed), with a
byte-bounded LRU cache. ``catalogue`` finds the output folders of ``histodetect slide``, their
slide files, regions, annotations and ``slide-eval`` detections. The HTTP side is
``histodetect.service.viewer``.
"""
