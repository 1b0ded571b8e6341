"""Steps 1 and 2: load and split a topic-labelled corpus, then tokenize and mask it."""
