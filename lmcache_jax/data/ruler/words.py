"""Words for needle keys and values: ``adjective-noun`` pairs, as RULER draws
them (RULER takes its lists from ``wonderwords``; these are our own). A
hyphenated pair of modern words does not occur in Shakespeare, so a needle's
key or value is found only where it was put; no word ends another (``icy``,
``spicy``), so no pair is a substring of another."""

ADJECTIVES = (
    "abrupt", "agile", "bashful", "bitter", "bouncy", "brisk", "bumpy",
    "chilly", "clumsy", "cozy", "crispy", "curly", "dusty", "eager", "fluffy",
    "frosty", "fuzzy", "giddy", "glossy", "grumpy", "hasty", "hollow", "humid",
    "itchy", "jazzy", "jolly", "lanky", "lumpy", "messy", "misty", "muddy",
    "nifty", "nimble", "noisy", "plump", "polite", "quirky", "rapid", "rusty",
    "salty", "shaggy", "shiny", "silky", "sleepy", "slimy", "snappy", "soggy",
    "spicy", "stormy", "sturdy", "sunny", "tangy", "tidy", "tiny", "vivid",
    "wacky", "wobbly", "woolly", "zany", "zesty")

NOUNS = (
    "accordion", "airport", "avocado", "backpack", "balloon", "bicycle",
    "blender", "bulldozer", "burrito", "calculator", "camera", "carousel",
    "cellphone", "chipmunk", "compass", "cupcake", "dinosaur", "doorbell",
    "elevator", "escalator", "flamingo", "freezer", "giraffe", "hamster",
    "helicopter", "iceberg", "jellyfish", "kangaroo", "keyboard", "ladder",
    "laptop", "lemonade", "magnet", "microwave", "mushroom", "notebook",
    "octopus", "pajamas", "pancake", "parachute", "penguin", "pretzel",
    "printer", "pumpkin", "raccoon", "robot", "rocket", "sandwich", "scooter",
    "skateboard", "spaceship", "submarine", "suitcase", "telescope",
    "toaster", "tornado", "trampoline", "umbrella", "volcano", "waffle")
