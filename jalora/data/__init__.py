"""Records in, tokenized examples out: reading and checking data files, prompts, tokenization, cache, collators."""
