"""Reference implementations: the slow, obviously-correct paths the fast code is tested against."""
