"""Analysis layer over the written stage-4c outputs (pure NumPy / pandas / scikit-learn, no
Spark): :mod:`injection_pipeline.analysis.realism` (the realism audit of a training set).
"""
