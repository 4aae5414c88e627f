"""Word lists and phrasings that `make_prompts.py` combines into the demo prompts.

Training parts and held-out parts are kept apart: every held-out prompt is written out in
full below, and `HELDOUT_KEYWORDS` lists the topic words that no training prompt may use
(make_prompts.py checks this).
"""

# ----- text prompts: topics and templates ------------------------------------------------

TOPICS = [
    # science and nature
    "photosynthesis", "the water cycle", "plate tectonics", "the immune system", "black holes",
    "the greenhouse effect", "ocean tides", "static electricity", "rainbows", "DNA",
    "natural selection", "the speed of sound", "magnetism", "volcanoes", "earthquakes",
    "the phases of the moon", "cloud formation", "lightning", "the periodic table", "friction",
    "gravity", "soil erosion", "the human heart", "sleep", "short-term memory",
    "bird migration", "rainforests", "deserts", "autumn leaf colors", "mushrooms and fungi",
    "octopus intelligence", "the solar system", "ocean currents", "the nitrogen cycle",
    "antibiotics", "the food chain", "hurricanes", "the life cycle of a butterfly",
    # technology
    "how computers store numbers", "operating systems", "wireless networks", "satellite navigation",
    "password hashing", "compilers", "relational databases", "internet routing", "electric cars",
    "solar panels", "lithium-ion batteries", "3D printing", "cloud computing", "spreadsheets",
    "version control with git", "machine learning", "search engines", "data compression",
    "public-key encryption", "touchscreens", "QR codes", "recommendation systems",
    # society, money and everyday life
    "compound interest", "inflation", "supply and demand", "recycling", "composting",
    "personal budgeting", "credit scores", "insurance", "minimum wage laws", "public libraries",
    "time zones", "daylight saving time", "the postal system", "elections", "city planning",
    "public transportation", "renewable energy", "food labels", "first aid", "volunteering",
    # history and culture
    "the printing press", "Roman aqueducts", "the Silk Road", "the invention of paper",
    "the Egyptian pyramids", "the first powered flight", "the history of the bicycle",
    "the ancient Olympic Games", "the Industrial Revolution", "the Renaissance",
    "the invention of the telephone", "maps and cartography", "the history of money",
    # food, health and hobbies
    "bread baking", "fermentation", "hydration", "stretching before exercise", "vitamins",
    "brewing coffee", "green tea", "meal planning", "houseplants", "birdwatching",
    "learning a second language", "perspective drawing", "musical rhythm", "haiku poetry",
    "film editing", "photography composition", "knitting", "board game design", "gardening in small spaces",
]

EXPLAIN_TEMPLATES = [
    "Explain {topic} in simple terms.",
    "Give a short explanation of {topic} for a beginner.",
    "What is the basic idea behind {topic}?",
    "Describe {topic} in a few sentences.",
    "Why does {topic} matter?",
    "I'm a high school student. Can you explain {topic} to me?",
    "Write a paragraph that explains {topic}.",
    "Can you give me an overview of {topic}?",
    "What should everyone know about {topic}?",
]

LIST_TEMPLATES = [
    "List five interesting facts about {topic}.",
    "Give me three key points about {topic}.",
    "What are some common misconceptions about {topic}?",
    "Name four questions a student might ask about {topic}, with short answers.",
    "Make a bulleted list of important terms related to {topic}.",
    "List the main pros and cons of {topic}.",
]

POEM_TEMPLATES = [
    "Write a short poem about {topic}.",
    "Write a haiku about {topic}.",
    "Write a four-line rhyming poem about {topic}.",
]

TERMS = [
    "algorithm", "metaphor", "ecosystem", "latitude", "interest rate", "hypothesis", "democracy",
    "photosynthesis", "inertia", "biodiversity", "irony", "bandwidth", "catalyst", "dividend",
    "empathy", "erosion", "fiction", "gene", "habitat", "hemisphere", "inflation", "isotope",
    "jargon", "kinetic energy", "mammal", "molecule", "nostalgia", "opinion", "oxygen", "peninsula",
    "prime number", "protein", "recession", "satire", "symbiosis", "tariff", "theorem", "tundra",
    "variable", "velocity", "vertebrate", "wavelength", "budget", "contract", "estuary", "fraction",
    "gigabyte", "glossary", "monopoly", "mortgage", "pixel", "prototype", "quorum", "refugee",
    "sonnet", "stereotype", "thesis", "vaccine", "watershed", "alloy",
]

DEFINE_TEMPLATES = [
    "Define '{term}'.",
    "What does the word '{term}' mean?",
    "Give a one-sentence definition of {term} and an example.",
    "Explain the term '{term}' as if I were a child.",
    "What is a {term}? Keep it brief.",
]

COMPARISON_PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("a lake", "a pond"), ("RAM", "disk storage"),
    ("a list", "a tuple in Python"), ("tea", "coffee"), ("renting a home", "buying a home"),
    ("crocodiles", "alligators"), ("speed", "velocity"), ("a simile", "a metaphor"),
    ("HTTP", "HTTPS"), ("comets", "asteroids"), ("baking soda", "baking powder"),
    ("a hurricane", "a tornado"), ("frogs", "toads"), ("butter", "margarine"),
    ("a debit card", "a credit card"), ("email", "postal mail"), ("a novel", "a short story"),
    ("running", "swimming as exercise"), ("a democracy", "a monarchy"), ("wool", "cotton"),
    ("a laptop", "a desktop computer"), ("stocks", "bonds"), ("weather satellites", "weather balloons"),
    ("mitosis", "meiosis"), ("an atom", "a molecule"), ("a plant cell", "an animal cell"),
    ("classical music", "folk music"), ("electric cars", "gasoline cars"), ("paper books", "e-books"),
    ("a compiler", "an interpreter"), ("SQL databases", "NoSQL databases"),
    ("wind power", "solar power"), ("a cold", "the flu"), ("a city", "a town"),
    ("reading", "listening to audiobooks"), ("bicycles", "scooters for commuting"),
    ("oil paint", "watercolor"), ("a museum", "a gallery"),
]

COMPARE_TEMPLATES = [
    "Compare {a} and {b}.",
    "What is the difference between {a} and {b}?",
    "How are {a} and {b} alike, and how are they different?",
    "Explain the main differences between {a} and {b} in a short table.",
]

STORY_CHARACTERS = [
    "a shy robot", "an old fisherman", "a curious fox", "a young inventor", "a retired teacher",
    "a lost kitten", "a bus driver", "a dragon afraid of heights", "two best friends",
    "a baker in a small village", "a girl who collects stones", "a talking tree", "a new student",
    "a mail carrier", "an astronaut on her first mission", "a grandfather and his grandson",
    "a clumsy wizard", "a street musician", "a farmer", "a boy who cannot whistle",
]

STORY_SITUATIONS = [
    "finds a mysterious key", "has to cross a river", "wakes up with a new talent",
    "loses something important", "meets a stranger on a train", "plans a surprise party",
    "gets stuck in an elevator", "discovers a hidden garden", "tries to win a cooking contest",
    "has a day when everything goes wrong", "learns to ride a bicycle", "finds a message in a bottle",
    "moves to a new city", "builds a boat", "helps a neighbor in a storm", "goes camping for the first time",
    "receives a letter from the future", "makes an unlikely friend", "has to tell the truth", "waits for snow",
]

STORY_TEMPLATES = [
    "Write a short story about {character} who {situation}.",
    "Tell a bedtime story about {character} who {situation}.",
    "Write a story of about 100 words in which {character} {situation}.",
    "Write a funny short story about {character} who {situation}.",
    "Write the opening paragraph of a story about {character} who {situation}.",
]

HOWTO_TASKS = [
    "make a cup of tea", "change a flat bicycle tire", "plant tomato seeds", "write a good cover letter",
    "prepare for a job interview", "clean a cast iron pan", "start running as a beginner",
    "organize a small closet", "back up the files on my computer", "learn to juggle",
    "make a simple budget", "boil an egg", "fold a fitted sheet", "take care of a succulent",
    "write a thank-you note", "study for an exam", "remove a coffee stain from a shirt",
    "set up a fish tank", "make pancakes", "train a puppy to sit", "improve my handwriting",
    "give a short speech", "pack a suitcase efficiently", "reduce food waste at home",
    "start a journal", "make a paper airplane", "build a birdhouse", "keep a conversation going",
    "choose a good password", "wash wool sweaters", "memorize a poem", "start learning to code",
    "make homemade lemonade", "sharpen a kitchen knife", "read a nutrition label",
    "fall asleep faster", "plan a road trip", "write a clear email", "save money on groceries",
    "repot a houseplant", "make a cheese sandwich", "ask for a raise", "stay focused while working from home",
    "set up a new phone", "brew coffee with a French press", "carve a pumpkin", "hang a picture frame",
    "teach a child to tie shoelaces", "fix a squeaky door", "take better photos with a phone",
]

HOWTO_TEMPLATES = [
    "How do I {task}?",
    "Give step-by-step instructions to {task}.",
    "What is the easiest way to {task}?",
    "Write a short guide on how to {task}.",
    "Can you give me some tips to {task}?",
]

SENTENCES_TO_REWRITE = [
    "The meeting has been moved to Thursday because a lot of people could not come on Tuesday.",
    "We need to talk about the budget before we decide on anything else.",
    "I think the movie was kind of long but the ending was really good.",
    "Please make sure you turn off the lights when you leave the office at night.",
    "The new park downtown has a playground, a pond and lots of benches for people to sit on.",
    "Our team finished the project two weeks early, which surprised everyone.",
    "It is raining today, so the football game will probably be cancelled.",
    "The restaurant was very crowded and the food took a long time to arrive.",
    "He forgot his umbrella at home and got completely wet on the way to work.",
    "The library will be closed for repairs during the whole month of August.",
    "Many students find it hard to concentrate when their phones are nearby.",
    "The price of apples went up this year because of the dry summer.",
    "She practiced the piano every day and finally played the song without mistakes.",
    "You should drink more water if you feel tired in the afternoon.",
    "The software update fixed several bugs but made the app a little slower.",
    "Thank you for coming to our event, we hope you had a good time.",
    "The train was late again, so I missed the first part of the lecture.",
    "Our neighbors are building a new fence between our two gardens.",
    "The museum offers free entry on the first Sunday of every month.",
    "I would like to return these shoes because they are too small.",
]

SENTENCES_WITH_ERRORS = [
    "me and him goes to the store yesterday to buy some bread",
    "their going to be late becuase the traffic are bad",
    "the dog wagged it's tail when it seen the owner",
    "i has finished my homework but i forgets to bring it",
    "she dont like coffee, she prefer tea in the morning",
    "we was planning to visit the museum but it were closed",
    "the childrens played in the park untill it get dark",
    "can you borrow me your pen for a minute",
    "this is the most easiest recipe i ever tryed",
    "the informations in the report was not correct",
]

REWRITE_TEMPLATES = [
    'Rewrite this sentence in a more formal tone: "{sentence}"',
    'Make this sentence shorter without losing its meaning: "{sentence}"',
    'Rewrite this so that a five-year-old can understand it: "{sentence}"',
    'Paraphrase the following sentence: "{sentence}"',
    'Rewrite this sentence in a cheerful, enthusiastic tone: "{sentence}"',
    'Turn this statement into a polite question: "{sentence}"',
]

GRAMMAR_TEMPLATES = [
    'Fix the grammar and spelling: "{sentence}"',
    'Correct the mistakes in this sentence: "{sentence}"',
    'Please proofread this: "{sentence}"',
]

CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the vowels in a sentence",
    "returns the largest value in a list", "converts Celsius to Fahrenheit",
    "removes duplicates from a list while keeping the order", "checks whether a word is a palindrome",
    "computes the factorial of n", "merges two sorted lists into one sorted list",
    "counts the lines in a text file", "returns the n-th Fibonacci number",
    "sorts a list of names by their length", "finds the most common word in a text",
    "checks that a string looks like an email address", "returns the average of a list of numbers",
    "capitalizes the first letter of every word", "flattens a nested list",
    "counts how often each character appears in a string", "returns today's date as YYYY-MM-DD",
    "splits a list into chunks of a given size",
]

# Language: weight, so that about half of the code prompts are in Python.
CODE_LANGUAGES = {"Python": 3, "JavaScript": 1, "Java": 1, "C": 1}

CODE_TEMPLATES = [
    "Write a {language} function that {task}.",
    "Show me {language} code that {task}.",
    "How would you write a short {language} snippet that {task}?",
    "Write a {language} function that {task}, and explain how it works.",
]

SQL_TASKS = [
    "lists all customers from Canada", "counts the orders placed in 2023",
    "finds the five most expensive products", "shows each department with its average salary",
    "deletes users who never logged in", "finds employees hired after January 2020",
    "joins an orders table with a customers table", "returns the total sales per month",
]

SHELL_TASKS = [
    "finds all .txt files in a folder and its subfolders", "counts the words in a file",
    "shows the ten largest files in the current folder", "renames every .jpeg file to .jpg",
    "prints the last 20 lines of a log file", "searches all files for the word TODO",
]

CODE_TO_EXPLAIN = [
    "numbers = [3, 8, 1, 9]\ntotal = 0\nfor n in numbers:\n    if n % 2 == 1:\n        total += n\nprint(total)",
    "def greet(name=\"friend\"):\n    return f\"Hello, {name}!\"\n\nprint(greet())\nprint(greet(\"Ana\"))",
    "words = \"the cat and the hat\".split()\ncounts = {}\nfor w in words:\n    counts[w] = counts.get(w, 0) + 1\nprint(counts)",
    "squares = [x * x for x in range(1, 6)]\nprint(squares[-1])",
    "const items = [4, 2, 7];\nconst doubled = items.map(x => x * 2);\nconsole.log(doubled);",
    "i = 10\nwhile i > 0:\n    print(i)\n    i -= 3",
]

LETTER_REQUESTS = [
    ("your landlord", "asking for a broken heater to be repaired"),
    ("a teacher", "thanking her for a great school year"),
    ("a friend who moved away", "telling them what is new in town"),
    ("the local newspaper", "suggesting more bike lanes in the city"),
    ("your future self", "describing your goals for the next five years"),
    ("a customer", "apologizing for a late delivery"),
    ("your team at work", "announcing a new weekly meeting time"),
    ("a hotel", "asking whether they allow pets"),
    ("a neighbor", "inviting them to a garden party"),
    ("your manager", "asking for a day off next Friday"),
    ("a company", "applying for a summer internship"),
    ("a bakery", "ordering a birthday cake for twenty people"),
    ("your grandmother", "thanking her for a birthday gift"),
    ("a city council", "asking for a new crosswalk near a school"),
    ("a bookshop", "asking whether a book can be ordered"),
    ("a sports club", "cancelling your membership"),
    ("a professor", "asking for an extension on an essay"),
    ("a volunteer group", "offering to help at their next event"),
    ("an airline", "asking about a lost suitcase"),
    ("a new coworker", "welcoming them to the team"),
]

LETTER_TEMPLATES = [
    "Write a short letter to {recipient} {purpose}.",
    "Draft a polite email to {recipient} {purpose}.",
    "Write a friendly note to {recipient} {purpose}.",
]

PASSAGES = [
    "Honeybees communicate the location of flowers through a movement called the waggle dance. "
    "A forager returns to the hive and walks in a figure-eight pattern, waggling her body during the "
    "straight part. The angle of that straight run shows the direction of the food relative to the sun, "
    "and its length tells the other bees how far away the flowers are.",
    "The town of Millbrook opened its first public library in 1902 with only three hundred books. Over "
    "the next century it grew into a busy community center. Today it lends laptops, runs reading clubs "
    "for children and offers free language classes for adults every evening.",
    "Regular walking is one of the simplest ways to improve health. Studies suggest that thirty minutes a "
    "day can lower blood pressure, improve mood and help with sleep. Unlike many other activities, it "
    "needs no special equipment and can be done almost anywhere.",
    "In the nineteenth century, many cities suffered from outbreaks of cholera. Doctors believed the "
    "disease spread through bad air. A careful study of cases in London showed that most of the sick "
    "had drawn water from the same public pump, which helped change how people thought about disease.",
    "A small company decided to try a four-day work week for six months. Employees worked the same "
    "number of tasks in fewer days. At the end of the trial, most staff reported less stress, and the "
    "company found that its output had stayed roughly the same.",
    "Deserts are not always hot. Antarctica is the largest desert on Earth because it receives very "
    "little precipitation. What makes a place a desert is the small amount of rain or snow it gets, "
    "not its temperature.",
    "The first bicycles had no pedals. Riders pushed themselves along with their feet. Later designs "
    "added pedals to the front wheel, which led to the tall penny-farthing. The modern bicycle, with two "
    "wheels of equal size and a chain, appeared in the 1880s and quickly became popular.",
    "Composting turns kitchen and garden waste into rich soil. Microorganisms break down materials such "
    "as vegetable peels, leaves and coffee grounds. A good compost pile needs a mix of green and brown "
    "materials, some moisture and occasional turning to let in air.",
    "Sleep plays an important role in learning. During deep sleep, the brain replays and strengthens "
    "memories formed during the day. Students who sleep well after studying often remember more than "
    "those who stay up late to study longer.",
    "The city council voted to turn an unused parking lot into a community garden. Residents will be "
    "able to rent small plots for a low yearly fee. The council hopes the garden will bring neighbors "
    "together and provide fresh vegetables for local families.",
    "Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, while the third "
    "pumps it to the rest of the body. Their blood is blue because it uses a copper-based molecule to "
    "carry oxygen instead of the iron-based one found in humans.",
    "Paper was invented in China around two thousand years ago. It was made from plant fibers such as "
    "bark and hemp. The technique slowly spread along trade routes to the Middle East and then to Europe, "
    "where paper mills became common by the fourteenth century.",
    "When a company wants to launch a new product, it often starts with a small test market. The product "
    "is sold in a few cities first, and the company watches how customers respond. This helps it fix "
    "problems before spending money on a national launch.",
    "Volcanic eruptions can affect the weather far away. Large eruptions send ash and gases high into "
    "the atmosphere, where they reflect sunlight. In some years after major eruptions, average "
    "temperatures around the world dropped slightly for a year or two.",
    "Learning a musical instrument as an adult is possible, although it may feel slow at first. Short "
    "daily practice works better than long sessions once a week. Many adult learners also find that "
    "playing with others keeps them motivated.",
    "Online reviews have changed how people choose restaurants. Before going out, many diners read what "
    "others have written and look at photos of the food. Restaurant owners now pay close attention to "
    "these reviews and often respond to complaints publicly.",
]

SUMMARY_TEMPLATES = [
    "Summarize this passage in one sentence:\n\n{passage}",
    "What is the main idea of the following text?\n\n{passage}",
    "Give three bullet points that summarize this:\n\n{passage}",
    "Write a title for this passage and a two-sentence summary.\n\n{passage}",
    "Summarize the text below for a busy reader.\n\n{passage}",
]

ADVICE_REQUESTS = [
    "What should I consider when choosing a laptop for university?",
    "Give me ideas for a rainy weekend at home with kids.",
    "Suggest five healthy snacks I can take to work.",
    "What are some good habits for staying organized?",
    "Give me ten names for a small bakery.",
    "What questions should I ask when visiting an apartment to rent?",
    "Suggest a weekly plan for someone who wants to start exercising.",
    "What are good ways to make new friends in a new city?",
    "Give me ideas for a birthday gift for someone who loves cooking.",
    "How can I make my presentations more interesting?",
    "What are some tips for learning vocabulary in a new language?",
    "Suggest a theme and three activities for a school science fair.",
    "Give me ideas for a short family trip that does not cost much.",
    "What can I do to use my phone less in the evening?",
    "Suggest three dinner recipes that use mostly vegetables.",
    "How should I prepare for my first day at a new job?",
    "What are some fun ways to practice math with children?",
    "Give me ideas for decorating a small bedroom.",
    "What should I pack for a weekend hiking trip?",
    "Suggest some topics for a blog about gardening.",
    "How can I keep my houseplants alive while I am on vacation?",
    "What are good questions to ask at the end of a job interview?",
    "Give me five ideas for a team-building activity at work.",
    "How do I decide between two job offers?",
    "Suggest a reading list of five classic novels for a beginner.",
    "What are some tips for writing a good product description?",
    "Give me ideas for a science project about plants.",
    "What are simple ways to save energy at home?",
    "Suggest a morning routine that helps me feel less rushed.",
    "What are some ways to welcome a new member to a club?",
    "Give me ideas for a themed dinner party.",
    "How can I become a better listener?",
    "What are some ways to keep a journal interesting?",
    "Suggest games that a group of six adults can play without a board.",
    "What should I look for when buying a used bicycle?",
    "Give me ideas for a short speech at a friend's wedding.",
    "How can I make a long car trip more fun for children?",
    "What are some ways to reduce plastic at home?",
    "Suggest a plan for reading more books this year.",
    "What are some polite ways to say no to extra work?",
]

MATH_PREFIXES = ["", "", "Solve this word problem step by step: ", "Show your work. "]

FOLLOW_UPS = [
    "Can you make that shorter?",
    "Now explain it again for a ten-year-old.",
    "Give me one more example.",
    "Put the main points in a bulleted list.",
    "Thanks! Can you add a title?",
    "What would be a good next step?",
    "Can you say that in a more formal way?",
    "Which part of that is most important?",
]

CODE_FOLLOW_UPS = [
    "Now add comments to the code.",
    "How would you test this?",
    "Can you make it handle empty input?",
]

# ----- image prompts (training images) --------------------------------------------------

TRAIN_IMAGES = {
    # file stem: name of the skimage.data function that loads the photo
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "retina": "retina",
}

IMAGE_TEMPLATES = [
    "Describe this image.",
    "Describe the picture in detail.",
    "What do you see in this photo?",
    "Give a short description of this image.",
    "Describe this image in one sentence.",
    "How many people are in this picture?",
    "Count the objects you can see in this image.",
    "How many distinct items are in the photo?",
    "What are the main colors in this image?",
    "Which color stands out the most in this picture?",
    "Describe the color palette of this photo.",
    "What is happening in this picture?",
    "What is going on in this scene?",
    "What might have happened just before this photo was taken?",
    "Write a caption for this photo.",
    "Suggest a title for this image.",
    "Write a social media post to go with this picture.",
    "Write a one-line caption for this image that would fit a magazine.",
    "Write a short story inspired by this picture.",
    "Tell a story about this picture for a child.",
    "Write a short poem about this image.",
    "Where might this photo have been taken?",
    "What is the mood of this image?",
    "List the objects you can see in this picture.",
    "Is this picture taken indoors or outdoors?",
    "What time of day does it seem to be in this image?",
    "What would be a good question to ask about this image?",
    "Describe the background of this photo.",
    "What is in the foreground of this picture?",
    "Describe this image to someone who cannot see it.",
    "What is the main subject of this image?",
]

IMAGE_SPECIFIC = {
    "astronaut": ["What is the person in this photo wearing?", "What job might the person in this picture have?",
                  "What is behind the person in this photo?"],
    "chelsea": ["What animal is shown here, and what is it doing?", "Describe the fur of the animal in this picture.",
                "What might this animal be thinking?"],
    "coffee": ["What drink is in the picture?", "Describe the cup and saucer in this photo.",
               "What kind of place might serve this?"],
    "rocket": ["What kind of vehicle is shown here?", "Describe the smoke and flames in this image.",
               "What is this rocket launch for, as far as you can tell?"],
    "hubble_deep_field": ["What are the bright spots in this image?", "How many galaxies can you count here?",
                          "What does this image tell us about the size of the universe?"],
    "retina": ["What kind of image is this, and what field would use it?", "Describe the lines in this image.",
               "What might a doctor look for in a picture like this?"],
}

IMAGE_FOLLOW_UPS = [
    "What colors stand out?",
    "Now write a caption for it.",
    "Could you make that description shorter?",
    "What else would you like to know about this picture?",
    "Write a short poem about it.",
]

# ----- held-out set: different topics, phrasings and images ------------------------------

HELDOUT_IMAGES = {"coins": "coins", "immunohistochemistry": "immunohistochemistry"}

HELDOUT_TEXT_PROMPTS = [
    "Walk me through how a refrigerator keeps food cold.",
    "Could you tell me how the game of chess spread from India to Europe?",
    "Write a limerick about a forgetful lighthouse keeper.",
    "Jenna buys 3 notebooks at $2.50 each and a pen for $1.20. She pays with a $10 bill. How much change does she get?",
    "Write a Rust function that returns the sum of the squares of a vector of integers.",
    "Turn these notes into a polite message to my roommate: dishes left in the sink, trash day is Monday, "
    "happy to make a chore chart.",
    "In plain words, how do glaciers carve valleys?",
    "What makes penguins good swimmers even though they cannot fly?",
    "Sketch out a three-day itinerary for someone visiting a city full of jazz clubs.",
    "Why do people get hiccups, and do any of the home remedies work?",
    "Pretend you are a tour guide and introduce the Rosetta Stone to a group of visitors.",
    "How do wind turbines turn a breeze into electricity?",
    "Summarize the rules of origami folding for someone who has never tried it, in four short steps.",
    "A submarine dives 120 meters, rises 45 meters, then dives another 30 meters. How deep is it now?",
    "Is it a good idea to haggle at a street market? Weigh both sides.",
    "Explain why fireflies glow, in a way a curious eight-year-old would enjoy.",
    "Describe how the metric system was created and why so many countries adopted it.",
    "Write a dialogue between two sundials arguing about whose time is correct.",
    "What does a bonsai gardener do each season to keep the tree small?",
    "Offer three arguments for and three against building roller coasters in city centers.",
]

# No training prompt may contain these words (lowercase); they mark the held-out topics.
HELDOUT_KEYWORDS = [
    "refrigerator", "chess", "lighthouse", "notebook", "rust", "roommate", "glacier", "penguin", "jazz",
    "hiccup", "rosetta", "turbine", "origami", "submarine", "haggl", "firefl", "metric", "sundial",
    "bonsai", "roller coaster", "coins", "immunohisto", "microscope",
]

HELDOUT_IMAGE_PROMPTS = [
    "Tell me what this picture shows.",
    "In a few words, what is this?",
    "Which shades dominate this image?",
    "Imagine this picture hangs in a museum. Write the label card for it.",
    "Write a limerick inspired by this image.",
    "What question would a scientist ask about this image?",
    "Explain what this image might be used for.",
    "Summarize this picture in three bullet points.",
    "What texture do you notice in this image?",
    "If you could step into this picture, what would you hear?",
]
