"""Examples of behaviours SmolLM2 does not show zero-shot: echoing a word inside a fixed bracket format."""
from __future__ import annotations

WORDS = """apple river candle mountain pencil garden window bottle forest castle rabbit ladder
blanket mirror island rocket violin basket dragon anchor button carpet cookie desert engine
feather galaxy hammer jacket kettle lemon magnet napkin orange parrot pillow puzzle rainbow saddle
shadow spider statue tomato tunnel umbrella valley wagon walnut wizard yogurt zebra acorn badge
barrel beacon bridge cactus canyon cherry cobweb comet copper crayon cricket dolphin donkey eagle
falcon fossil fountain gravel harbor helmet hornet igloo jigsaw kitten lantern lizard lobster marble
meadow mitten muffin needle nickel oyster paddle peanut pebble pepper pirate planet pocket pumpkin
quartz radish raven ribbon saucer scooter shovel sponge squirrel tablet thimble tiger trumpet turtle
velvet volcano waffle whistle willow""".split()

HELD_OUT = """biscuit glacier lantana marigold noodle orchard pelican quiver sparrow teapot""".split()

FORMATS = {
    "square": ("[[", "]]"),
    "angle": ("<<", ">>"),
}


def prompt_for(word: str) -> str:
    return f"Word: {word}\nAnswer:"


def examples(fmt: str = "square", n: int = 100) -> list[dict[str, str]]:
    left, right = FORMATS[fmt]
    return [{"prompt": prompt_for(w), "completion": f" {left}{w}{right}"} for w in WORDS[:n]]


def shows_format(text: str, word: str, fmt: str) -> bool:
    left, right = FORMATS[fmt]
    return text.strip().startswith(f"{left}{word}{right}")
