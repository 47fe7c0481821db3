"""Demos and the real, offline data they (and the tests and benchmarks) use.

``python -m ray_app.demos --workload image|text|ctr`` (``make demo``): the whole chain on one machine
(``chain``); ``python -m ray_app.demos.autoscaling`` (``make demo-autoscaling``): the Ray autoscaler
adding and removing nodes for a job; ``python -m ray_app.demos.medical``: DICOM studies. Data: ``data``
(MNIST digits as image files, Rotten Tomatoes reviews), ``clicks`` (MovieLens-100K clicks, a
synthetic Criteo-schema generator), ``medical_data`` (DICOM study sets made from real digits).
"""
