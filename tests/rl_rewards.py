"""User reward functions for the RL tests (`--rewards rl_rewards:words`): TRL's signature."""


def words(prompts, completions, **columns):
    """The number of words: deterministic, and different between samples of a random model."""
    return [float(len(c.split())) for c in completions]
