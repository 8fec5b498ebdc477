"""GenRec, SDPORec and CausalDPO as RecBole ``SequentialRecommender`` models (each a few lines on ``LLMRecommender``)."""
