"""Measures of a generated corpus: diversity (:mod:`.diversity`) and label shortcuts (:mod:`.bias`)."""
