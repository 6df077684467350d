"""The semantic-cache workload: 50 questions, each with a paraphrase that should be
answered from the cache, and near misses (same topic, another question) that must not.

Used by ``python -m pagellm.benchmarks.semantic_cache`` (docs/policy.md)."""

from __future__ import annotations

# (question, paraphrase): the paraphrase asks the same thing in other words.
PAIRS: list[tuple[str, str]] = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reverse a list in Python?", "What is the way to reverse a Python list?"),
    ("How many legs does a spider have?", "What is the number of legs on a spider?"),
    (
        "What is the boiling point of water at sea level?",
        "At sea level, at what temperature does water boil?",
    ),
    ("Who wrote the play Romeo and Juliet?", "Who is the author of Romeo and Juliet?"),
    ("How do I make a cup of green tea?", "What are the steps to brew green tea?"),
    ("What causes the seasons on Earth?", "Why does the Earth have seasons?"),
    ("How can I improve my sleep?", "What can I do to sleep better?"),
    ("What is photosynthesis?", "Can you explain what photosynthesis is?"),
    (
        "How do I convert Celsius to Fahrenheit?",
        "What is the formula to change Celsius into Fahrenheit?",
    ),
    (
        "What is the largest planet in the solar system?",
        "Which planet is the biggest in our solar system?",
    ),
    ("How do I center a div in CSS?", "What is the way to center a div with CSS?"),
    ("What are the symptoms of the flu?", "What symptoms does influenza cause?"),
    (
        "How long should I boil an egg for a soft yolk?",
        "For how many minutes do I boil an egg to get a runny yolk?",
    ),
    (
        "What is the difference between a virus and a bacterium?",
        "How is a virus different from a bacterium?",
    ),
    ("How do I undo the last git commit?", "How can I revert my most recent commit in git?"),
    ("What is the speed of light?", "How fast does light travel?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("How do I write a good cover letter?", "What makes a cover letter effective?"),
    ("What is the tallest mountain in the world?", "Which mountain on Earth is the highest?"),
    ("How do vaccines work?", "In what way do vaccines protect the body?"),
    ("What is a prime number?", "Can you define a prime number?"),
    ("How do I save money on groceries?", "What are ways to spend less on groceries?"),
    ("What is the population of Japan?", "How many people live in Japan?"),
    (
        "How do I read a file line by line in Python?",
        "In Python, how can I iterate over the lines of a file?",
    ),
    ("What is inflation in economics?", "Explain what economic inflation means."),
    ("How do I get rid of hiccups?", "What is a way to stop hiccups?"),
    ("What does DNA stand for?", "What is the full name of DNA?"),
    ("How many continents are there?", "What is the number of continents on Earth?"),
    ("How do I train a puppy to sit?", "What is the way to teach a puppy to sit?"),
    ("What is the meaning of the word ephemeral?", "What does ephemeral mean?"),
    ("How do solar panels produce electricity?", "How do solar panels generate power?"),
    ("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?"),
    ("What is the chemical formula of table salt?", "What is table salt's chemical formula?"),
    ("How do I change a flat tire?", "What are the steps for changing a flat tyre?"),
    ("What is machine learning?", "Can you explain what machine learning is?"),
    ("How much water should I drink every day?", "How many liters of water should I drink daily?"),
    (
        "What is the freezing point of water in Fahrenheit?",
        "At what Fahrenheit temperature does water freeze?",
    ),
    ("How do I remove a stain from a white shirt?", "How can I get a stain out of a white shirt?"),
    ("When did World War II end?", "In what year did the Second World War end?"),
    ("How do I make my password more secure?", "What makes a password stronger?"),
    ("What is the main function of the heart?", "What does the heart do in the body?"),
    (
        "How do I sort a dictionary by value in Python?",
        "How can a Python dict be sorted by its values?",
    ),
    ("What is the largest ocean on Earth?", "Which ocean is the biggest in the world?"),
    ("How do plants absorb water?", "In what way do plants take up water?"),
    ("What is a black hole?", "Can you describe what a black hole is?"),
    (
        "How do I start running as a beginner?",
        "What is a good way for a beginner to start running?",
    ),
    ("What language is spoken in Brazil?", "Which language do people in Brazil speak?"),
    ("How do I calculate the area of a circle?", "What is the formula for a circle's area?"),
    (
        "What is the difference between weather and climate?",
        "How does weather differ from climate?",
    ),
]

# Same topic as a question above, but a different question: a hit on one is a wrong hit.
NEAR_MISSES: list[str] = [
    "What is the capital of Spain?",
    "How do I sort a list in Python?",
    "How many legs does an insect have?",
    "What is the boiling point of water on Mount Everest?",
    "Who wrote the play Hamlet?",
    "How do I make a cup of black coffee?",
    "What is the smallest planet in the solar system?",
    "How do I center text in CSS?",
    "What are the symptoms of a cold?",
    "How do I undo the last git push?",
    "What is the speed of sound?",
    "Why is the sea salty?",
    "What is the population of Germany?",
    "How do I write a file line by line in Python?",
    "What does RNA stand for?",
    "Who painted The Starry Night?",
    "When did World War I end?",
    "What is the smallest ocean on Earth?",
    "What language is spoken in Mexico?",
    "How do I calculate the area of a square?",
]
