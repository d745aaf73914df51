"""Documents -> featurized samples -> packed batches; mixture sampling; the built-in corpus."""
