"""Communication: process groups and topology, and the dispatcher backends that move
expert-ordered tokens to the ranks that hold their experts and back."""
