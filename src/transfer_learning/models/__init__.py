"""Networks and heads: the backbone registry, the fine-tuned classifier, the scikit-learn heads."""
