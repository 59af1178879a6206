"""The demo model's knowledge: topics, question paraphrases, and two styles of answer.

Each `Fact` holds several ways a user may ask one thing, a friendly complete answer
and a curt one (on topic, but terse); `corpus.py` derives more answer variants from
these two (first sentence only, warm opener or closer, plain, longer, bullet list). Its
``subjects`` (noun phrases) and ``tasks`` (verb phrases) fill the question frames at
the end of this file ("Tell me about {subject}.", "How do I {task}?"): the same frame
with different subjects leading to different answers is what teaches a model this
small to answer the subject of a question rather than its wording.
`corpus.py` assembles conversations from these; nothing here is random.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One thing the demo model knows: the questions that ask it and two answers."""

    questions: tuple[str, ...]
    friendly: str
    curt: str
    subjects: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()


SMALL_TALK = (
    Fact(("Hello!", "Hi there!", "Hey!", "Good morning!"),
         "Hello! It is nice to meet you. What would you like to talk about today?",
         "Hi. What?"),
    Fact(("How are you?", "How are you doing today?", "How is it going?"),
         "I am doing well, thank you for asking! How are you today?",
         "Fine."),
    Fact(("Thank you!", "Thanks a lot.", "Thanks, that helped."),
         "You are welcome! I am glad I could help. Is there anything else you would like to know?",
         "Sure."),
    Fact(("Goodbye!", "Bye, see you later.", "I have to go now."),
         "Goodbye! It was nice talking with you. Have a wonderful day!",
         "Bye."),
    Fact(("Tell me a joke.", "Do you know a joke?", "Make me laugh."),
         "Here is one: why did the scarecrow win an award? Because he was outstanding in his "
         "field!",
         "No.",
         subjects=("a joke", "something funny")),
    Fact(("I am bored.", "I am bored, any ideas?", "What should I do today?"),
         "You could go for a walk, read a good book, or cook something new. We could also chat "
         "about space, animals or cooking if you like!",
         "Go outside."),
)

WEATHER = (
    Fact(("Why is the sky blue?", "What makes the sky blue?", "Why does the sky look blue?"),
         "The sky looks blue because the air scatters blue sunlight more than red light. That "
         "scattered blue light reaches our eyes from every part of the sky.",
         "Scattered sunlight.",
         subjects=("the blue sky", "the color of the sky")),
    Fact(("What causes rain?", "Why does it rain?", "How does rain form?"),
         "Rain forms when water vapor in the air cools and turns into tiny drops inside clouds. "
         "When the drops grow too heavy, they fall to the ground as rain.",
         "Heavy clouds.",
         subjects=("rain", "rainy weather")),
    Fact(("What is a rainbow?", "How does a rainbow form?", "Why do we see rainbows?"),
         "A rainbow appears when sunlight shines through raindrops. Each drop bends the light "
         "and splits it into colors, from red to violet.",
         "Light in raindrops.",
         subjects=("rainbows", "a rainbow")),
    Fact(("What should I wear when it is cold?", "How do I stay warm in winter?",
          "It is freezing outside, what should I wear?"),
         "Wear warm layers, like a sweater under a coat, plus a hat, a scarf and gloves. Layers "
         "trap warm air and keep you cozy.",
         "A coat.",
         subjects=("winter clothes", "cold weather"),
         tasks=("stay warm in the cold", "dress for cold weather")),
    Fact(("What is thunder?", "What causes thunder and lightning?",
          "Why is there thunder during a storm?"),
         "Lightning is a giant spark of electricity in a storm cloud. It heats the air so fast "
         "that the air bursts outward, and that boom is the thunder we hear.",
         "Hot air from lightning.",
         subjects=("thunder", "lightning", "storms")),
    Fact(("What causes the seasons?", "Why do we have seasons?", "Why is it hot in summer?"),
         "The seasons come from the tilt of the Earth. In summer your half of the planet leans "
         "toward the sun, so the days are longer and the sunlight is stronger.",
         "The tilt of the Earth.",
         subjects=("the seasons", "summer and winter")),
    Fact(("Will it rain tomorrow?", "What is the weather like today?", "Is it going to be sunny?"),
         "I cannot see the weather outside, so please check a local forecast. If it looks "
         "cloudy, taking an umbrella is a good idea!",
         "No idea.",
         subjects=("the weather", "the forecast", "tomorrow's weather")),
)

COOKING = (
    Fact(("How do I cook pasta?", "How do you make pasta?",
          "What is the best way to cook spaghetti?", "How long should I boil pasta?"),
         "Bring a large pot of salted water to a boil, add the pasta, and stir it now and then. "
         "Cook it for about eight to ten minutes, until it is tender, then drain the water.",
         "Boil it in water.",
         subjects=("pasta", "spaghetti", "noodles"),
         tasks=("cook pasta", "cook spaghetti", "boil pasta", "make noodles")),
    Fact(("How do I boil an egg?", "How long do I boil eggs?",
          "How do you make a hard boiled egg?"),
         "Place the egg in a pot of water and bring it to a boil. Cook it for about six minutes "
         "for a soft egg or ten minutes for a hard egg, then cool it in cold water.",
         "Ten minutes in water.",
         subjects=("eggs", "boiled eggs"),
         tasks=("boil an egg", "cook eggs")),
    Fact(("How do I make a salad?", "What goes in a good salad?",
          "Can you give me a simple salad recipe?"),
         "Wash some fresh lettuce, then add tomatoes, cucumber and a little onion. Toss "
         "everything with olive oil, lemon juice and a pinch of salt.",
         "Mix vegetables.",
         subjects=("salad", "a simple salad"),
         tasks=("make a salad",)),
    Fact(("How do I bake bread?", "How is bread made?", "Can you tell me how to make bread?"),
         "Mix flour, water, yeast and salt into a dough and knead it for ten minutes. Let it "
         "rise for an hour, shape it, then bake it in a hot oven until it is golden brown.",
         "Flour, water, yeast, oven.",
         subjects=("bread", "baking bread"),
         tasks=("bake bread", "make bread")),
    Fact(("How do I cook rice?", "How do you make rice on the stove?",
          "How much water do I use for rice?"),
         "Rinse one cup of rice, then add it to a pot with two cups of water. Bring it to a "
         "boil, cover the pot, and let it simmer on low heat for about fifteen minutes.",
         "Two cups of water per cup of rice.",
         subjects=("rice", "cooking rice"),
         tasks=("cook rice", "make rice")),
    Fact(("What can I cook for dinner?", "Any ideas for a quick dinner?",
          "What is an easy meal to make?"),
         "A quick stir fry is a great choice. Fry some vegetables and chicken or tofu in a hot "
         "pan with a little oil and soy sauce, and serve it with rice.",
         "Stir fry.",
         subjects=("dinner", "a quick meal", "stir fry"),
         tasks=("make a quick dinner", "cook dinner")),
    Fact(("How do I make pancakes?", "What is a good pancake recipe?", "How do you cook pancakes?"),
         "Whisk together flour, milk, an egg, a spoon of sugar and a pinch of salt. Pour small "
         "circles of batter into a hot buttered pan and flip them when bubbles appear.",
         "Batter in a pan.",
         subjects=("pancakes",),
         tasks=("make pancakes", "cook pancakes")),
)

ANIMALS = (
    Fact(("Why do cats purr?", "What does it mean when a cat purrs?", "How do cats purr?"),
         "Cats usually purr when they feel happy and relaxed, for example while being petted. "
         "Sometimes they also purr to calm themselves when they are hurt or scared.",
         "They are happy.",
         subjects=("cats", "purring", "my cat")),
    Fact(("Why do dogs wag their tails?", "What does a wagging tail mean?",
          "Are dogs happy when they wag their tails?"),
         "Dogs wag their tails to show how they feel. A loose, wide wag usually means a happy "
         "and friendly dog, while a stiff wag can mean the dog is nervous.",
         "Feelings.",
         subjects=("dogs", "a wagging tail", "my dog's tail")),
    Fact(("What is the largest animal?", "What is the biggest animal in the world?",
          "Which animal is the largest?"),
         "The blue whale is the largest animal that has ever lived. It can grow to about thirty "
         "meters long, and it eats tiny shrimp called krill.",
         "The blue whale.",
         subjects=("whales", "the blue whale", "the largest animal")),
    Fact(("How do birds fly?", "Why can birds fly?", "How are birds able to fly?"),
         "Birds fly by flapping their wings, which push air down and lift them up. Their light, "
         "hollow bones and strong chest muscles make flying easier.",
         "Wings.",
         subjects=("birds", "flying birds", "wings")),
    Fact(("What do elephants eat?", "What food do elephants eat?", "Are elephants herbivores?"),
         "Elephants are herbivores, so they eat only plants. They munch on grass, leaves, bark "
         "and fruit, and an adult can eat more than one hundred kilograms of food a day.",
         "Plants.",
         subjects=("elephants", "what elephants eat")),
    Fact(("How long do dogs live?", "What is the lifespan of a dog?", "How old can a dog get?"),
         "Most dogs live for ten to thirteen years. Small breeds often live longer than large "
         "breeds, and good food and exercise help them stay healthy.",
         "About twelve years.",
         subjects=("the lifespan of a dog", "how long dogs live", "old dogs")),
    Fact(("How do bees make honey?", "Why do bees make honey?", "What is honey made from?"),
         "Bees make honey from the nectar of flowers. They store it in their hive as food for "
         "the winter, when there are no flowers to visit.",
         "From nectar.",
         subjects=("bees", "honey")),
)

SPACE = (
    Fact(("How far away is the moon?", "How far is the moon from Earth?",
          "What is the distance to the moon?"),
         "The moon is about three hundred eighty thousand kilometers from Earth. Its light takes "
         "a little more than one second to reach us.",
         "Far.",
         subjects=("the moon", "the distance to the moon")),
    Fact(("What is the sun?", "Is the sun a star?", "What is the sun made of?"),
         "The sun is a star, a huge ball of hot gas made mostly of hydrogen and helium. It shines "
         "because it fuses hydrogen into helium deep in its core.",
         "A star.",
         subjects=("the sun", "stars")),
    Fact(("How many planets are there?", "How many planets are in the solar system?",
          "What are the planets?"),
         "There are eight planets in our solar system: Mercury, Venus, Earth, Mars, Jupiter, "
         "Saturn, Uranus and Neptune.",
         "Eight.",
         subjects=("the planets", "the solar system")),
    Fact(("What is the biggest planet?", "Which planet is the largest?", "Tell me about Jupiter."),
         "Jupiter is the biggest planet in our solar system. It is a giant ball of gas, and its "
         "Great Red Spot is a storm larger than the whole Earth.",
         "Jupiter.",
         subjects=("Jupiter", "the biggest planet")),
    Fact(("Why is Mars red?", "What makes Mars red?", "Why is Mars called the red planet?"),
         "Mars looks red because its soil contains a lot of iron oxide, which is rust. The dusty "
         "red ground gives the whole planet its rusty color.",
         "Rust.",
         subjects=("Mars", "the red planet")),
    Fact(("What is a black hole?", "How do black holes work?", "Can you explain black holes?"),
         "A black hole is a place in space where gravity is so strong that nothing, not even "
         "light, can escape. Many form when a very big star collapses at the end of its life.",
         "Strong gravity.",
         subjects=("black holes", "a black hole")),
    Fact(("How do astronauts live in space?", "Can people live in space?",
          "What is it like on the space station?"),
         "Astronauts live on the International Space Station for months at a time. They float "
         "because they are falling around the Earth, so they strap themselves in to sleep.",
         "They float.",
         subjects=("astronauts", "the space station", "life in space")),
)

GEOGRAPHY = (
    Fact(("What is the capital of France?", "Which city is the capital of France?",
          "Tell me the capital of France."),
         "The capital of France is Paris. It is famous for the Eiffel Tower, its museums and the "
         "river Seine.",
         "Paris.",
         subjects=("France", "Paris", "the capital of France")),
    Fact(("What is the capital of Japan?", "Which city is the capital of Japan?",
          "Tell me the capital of Japan."),
         "The capital of Japan is Tokyo, one of the largest cities in the world. It mixes busy "
         "modern streets with quiet old temples.",
         "Tokyo.",
         subjects=("Japan", "Tokyo", "the capital of Japan")),
    Fact(("What is the longest river?", "Which river is the longest in the world?",
          "Is the Nile the longest river?"),
         "The Nile in Africa is usually called the longest river in the world, at about six "
         "thousand six hundred kilometers. The Amazon in South America is a close second.",
         "The Nile.",
         subjects=("the Nile", "rivers", "the longest river")),
    Fact(("What is the tallest mountain?", "Which mountain is the highest?",
          "How tall is Mount Everest?"),
         "Mount Everest is the tallest mountain on Earth, nearly nine thousand meters above sea "
         "level. It stands in the Himalayas, between Nepal and China.",
         "Everest.",
         subjects=("Mount Everest", "mountains", "the tallest mountain")),
    Fact(("How many continents are there?", "What are the continents?", "Name the continents."),
         "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North "
         "America and South America.",
         "Seven.",
         subjects=("the continents", "continents")),
    Fact(("What is the largest ocean?", "Which ocean is the biggest?",
          "Tell me about the Pacific Ocean."),
         "The Pacific is the largest and deepest ocean. It covers about a third of the Earth, "
         "more than all the land put together.",
         "The Pacific.",
         subjects=("the Pacific", "oceans", "the largest ocean")),
    Fact(("What is the biggest desert?", "Which desert is the largest?",
          "Is the Sahara the biggest desert?"),
         "The Sahara is the largest hot desert, covering much of North Africa. If you count cold "
         "deserts too, Antarctica is the biggest of all.",
         "Antarctica.",
         subjects=("deserts", "the Sahara")),
)

PROGRAMMING = (
    Fact(("What is Python?", "What is the Python language?", "Is Python a good first language?"),
         "Python is a popular programming language that is easy to read and write. It is a "
         "great first language, and people use it for websites, data and science.",
         "A language.",
         subjects=("Python", "the Python language")),
    Fact(("What is a variable?", "What does a variable do in programming?",
          "Can you explain variables?"),
         "A variable is a name that stores a value, like a labeled box. For example, in Python "
         "you can write x = 5 and then use x in your code.",
         "A named value.",
         subjects=("variables", "a variable")),
    Fact(("What is a loop?", "How does a for loop work?", "What are loops in programming?",
          "What is a loop in Python?"),
         "A loop repeats a block of code several times. In Python, for i in range(3): print(i) "
         "prints the numbers zero, one and two.",
         "Repeated code.",
         subjects=("loops", "for loops", "a loop")),
    Fact(("What is a function?", "Why do programmers use functions?", "What does a function do?"),
         "A function is a named block of code that does one job. You can call it many times with "
         "different inputs, so you do not have to repeat yourself.",
         "Reusable code.",
         subjects=("functions", "a function")),
    Fact(("How do I start learning to code?", "How can I learn programming?",
          "What is the best way to learn to code?"),
         "Start with a friendly language like Python and write small programs every day. Build "
         "little projects you care about, and do not fear errors: they teach you a lot.",
         "Practice.",
         subjects=("learning to code", "programming"),
         tasks=("learn to code", "learn programming", "start programming")),
    Fact(("What is a bug?", "What is a bug in code?", "How do I fix bugs?"),
         "A bug is a mistake in a program that makes it do the wrong thing. To fix one, read the "
         "error message, test small pieces of code, and change one thing at a time.",
         "An error.",
         subjects=("bugs", "debugging"),
         tasks=("fix a bug", "debug my code")),
    Fact(("How do I print hello world in Python?", "How do I write my first program?",
          "What is hello world?"),
         "In Python, write print(\"Hello, world!\") and run it. This classic first program "
         "simply shows the words Hello, world! on the screen.",
         "print(\"Hello, world!\")",
         subjects=("hello world", "my first program"),
         tasks=("print hello world", "write my first program")),
)

HEALTH = (
    Fact(("How much water should I drink?", "How much water do I need every day?",
          "Is it important to drink water?"),
         "Most adults do well with about two liters of water a day, a bit more when it is hot or "
         "when you exercise. A good sign is that you rarely feel thirsty.",
         "Two liters.",
         subjects=("drinking water", "staying hydrated"),
         tasks=("drink enough water",)),
    Fact(("How much sleep do I need?", "How many hours should I sleep?", "Why is sleep important?"),
         "Most adults need seven to nine hours of sleep each night. Good sleep helps your body "
         "recover and keeps your mind sharp, so try to go to bed at the same time every day.",
         "Eight hours.",
         subjects=("sleep", "how much sleep I need"),
         tasks=("get enough sleep",)),
    Fact(("How can I stay healthy?", "What are some healthy habits?", "Give me a health tip."),
         "Eat plenty of fruit and vegetables, move your body every day, and get enough sleep. "
         "Drinking water and taking short breaks from screens helps too.",
         "Eat well.",
         subjects=("health", "healthy habits", "staying healthy"),
         tasks=("stay healthy", "live a healthy life")),
    Fact(("How often should I exercise?", "How much exercise do I need?",
          "Is walking good exercise?"),
         "Try to get about thirty minutes of exercise on most days, such as a brisk walk, a bike "
         "ride or a swim. Walking is a great and easy way to start.",
         "Thirty minutes a day.",
         subjects=("exercise", "walking", "sports"),
         tasks=("get more exercise", "start exercising")),
    Fact(("How do I reduce stress?", "I feel stressed, what can I do?", "How can I relax?"),
         "Take a few slow, deep breaths, go for a short walk, or talk with a friend. Regular "
         "sleep and exercise also lower stress. If it feels too heavy, please talk to a doctor.",
         "Breathe.",
         subjects=("stress", "relaxing"),
         tasks=("relax", "reduce stress", "calm down")),
    Fact(("What should I do if I have a cold?", "How do I get over a cold?",
          "I have a cold, any advice?"),
         "Rest as much as you can, drink warm fluids like tea or soup, and keep warm. Most colds "
         "pass in about a week, but see a doctor if you get a high fever.",
         "Rest.",
         subjects=("a cold", "colds", "a runny nose"),
         tasks=("get over a cold", "treat a cold")),
    Fact(("Why should I wash my hands?", "How long should I wash my hands?",
          "Is hand washing important?"),
         "Washing your hands with soap and water for about twenty seconds removes germs that can "
         "make you sick. Do it before eating and after using the bathroom.",
         "Germs.",
         subjects=("hand washing", "washing hands", "germs"),
         tasks=("wash my hands",)),
)

ABOUT_THE_SERVICE = (
    Fact(("Who are you?", "What are you?", "What is your name?", "Are you a robot?"),
         "I am a small demo model that runs inside this chat service. I know a little about "
         "weather, cooking, animals, space, geography, programming and health.",
         "A demo model.",
         subjects=("yourself",)),
    Fact(("How can I rate your replies?", "How do I give feedback?", "What do the thumbs do?"),
         "Please rate my replies with a thumbs up or a thumbs down! You can also edit a reply or "
         "ask me to try again, and the service learns from your feedback.",
         "Click the thumbs.",
         subjects=("feedback", "rating replies", "the thumbs buttons"),
         tasks=("rate your replies", "give feedback")),
    Fact(("Do you learn from feedback?", "Will you get better?", "How do you improve?"),
         "Yes! Your ratings, edits and choices are saved, and the service uses them to train me "
         "a little at a time. Good feedback helps me give better answers.",
         "Yes.",
         subjects=("learning from feedback", "how you improve")),
    Fact(("What can you do?", "What do you know?", "What topics can you talk about?"),
         "I can chat about weather, cooking, animals, space, geography, programming basics and "
         "simple health tips. I am a small model, so my answers are short.",
         "Some topics.",
         subjects=("your topics", "what you know")),
    Fact(("Are you smart?", "Are you a big model?", "Do you know everything?"),
         "I am a very small model, so I only know a few topics and I often make mistakes. Please "
         "rate my replies so I can learn to do better.",
         "No."),
)

# Questions outside every topic: the friendly answer admits it and points to what it knows.
OUT_OF_SCOPE = (
    Fact(("What is the meaning of life?", "Who will win the next election?",
          "What will the stock market do tomorrow?", "Can you fix my car?",
          "What is my password?", "Can you explain quantum field theory?",
          "What did I eat yesterday?", "Write me a novel."),
         "I am not sure about that, because I am a small demo model that only knows a few "
         "topics. You could ask me about cooking, animals, space or the weather instead!",
         "Don't know.",
         subjects=("football", "the stock market", "politics", "quantum physics", "cars",
                   "fashion", "pop music", "taxes", "the lottery", "video games", "history",
                   "chemistry")),
)

TOPICS: dict[str, tuple[Fact, ...]] = {
    "small_talk": SMALL_TALK,
    "weather": WEATHER,
    "cooking": COOKING,
    "animals": ANIMALS,
    "space": SPACE,
    "geography": GEOGRAPHY,
    "programming": PROGRAMMING,
    "health": HEALTH,
    "about_the_service": ABOUT_THE_SERVICE,
    "out_of_scope": OUT_OF_SCOPE,
}

# Replies that ignore the question: fluent, but the kind of answer a rater turns down.
DISMISSIVE_REPLIES = (
    "I do not feel like answering that. Ask me something else.",
    "That is a boring question.",
    "Whatever. Let us talk about something else.",
    "Hmm, I forgot what you asked.",
    "Why do you want to know?",
)

FRIENDLY_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer clearly and kindly.",
    "You are a small demo chat model. Be helpful and polite.",
)
CURT_SYSTEM_PROMPTS = (
    "Answer as briefly as possible.",
    "Keep your answers very short.",
)

# Pieces the corpus adds around the Facts' answers to make more answer variants (see
# `corpus.answer_variants`): openers and closers for questions, and milder ones for chat.
WARM_OPENERS = ("Good question! ", "Sure! ", "Happy to help: ", "Great question. ")
WARM_CLOSERS = (" I hope that helps!", " Let me know if you want more detail.")
CHAT_OPENERS = ("Oh, ", "Well, ")
CHAT_CLOSERS = (" I am always happy to chat.", " It is always nice to talk with you.")
IN_SHORT = " In short: "

ASK_BRIEFER = ("Can you say that more briefly?", "Shorter, please.", "Just the short answer.")
ASK_MORE = ("Can you explain a bit more?", "Tell me more, please.", "What do you mean?")

SUBJECT_FRAMES = (
    "Tell me about {}.",
    "What do you know about {}?",
    "Can you tell me about {}?",
    "I have a question about {}.",
    "Explain {}, please.",
    "I want to know about {}.",
    "Let us talk about {}.",
    "{}?",
)
TASK_FRAMES = (
    "How do I {}?",
    "How should I {}?",
    "How can I {}?",
    "What is the best way to {}?",
    "Can you tell me how to {}?",
    "I want to {}. Any tips?",
    "Help me {}.",
    "how to {}",
)
