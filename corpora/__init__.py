"""Corpora for dni_rnn: tokenised id streams, vocabularies, batching and synthetic tasks."""
