"""The texts of the synthetic data (``personalm.data.synthetic``): each subset's communities, post templates and
comment styles, the rankings of the styles, and the neutral sentences that lengthen posts and comments."""

# Each community's ranking of the three styles (best first). Across the four rankings
# (0,2,1) (1,2,0) (2,1,0) (0,1,2) every pair of styles is won 2:2, so no style is better "on Reddit".
RANKINGS = [(0, 2, 1), (1, 2, 0), (2, 1, 0), (0, 1, 2)]

SUBSETS = {
    "finance": {
        "communities": ["personalfinance", "wallstreetbets", "Frugal", "investing"],  # careful, bold, thrifty, careful
        "titles": ["Should I put my {thing} into {asset}?", "What do I do with a {thing} of {amount}?",
                   "Is it smart to use my {thing} for {asset}?", "Got a {thing}, now what about {asset}?"],
        "bodies": ["I am {age} and have {amount} saved. My job is stable but rent keeps going up.",
                   "My partner and I just got a {thing}. We have some debt and no real plan yet.",
                   "I keep reading about {asset} and I do not know if it fits someone who is {age}.", ""],
        "slots": {"thing": ["bonus", "tax refund", "inheritance", "raise", "windfall"],
                  "asset": ["index funds", "crypto", "a house", "options", "bonds", "gold"],
                  "amount": ["5k", "12k", "40k", "100k", "800 dollars"], "age": ["22", "29", "35", "47", "58"]},
        "styles": [  # A: careful, B: bold, C: thrifty
            ["Build an emergency fund of {n} months first, then buy a low cost index fund and wait.",
             "Pay off the high interest debt, max the retirement account, and diversify slowly.",
             "Keep it boring: broad index funds, automatic contributions, and no panic selling."],
            ["Put it all into {ticker} calls and hold, this is how you get rich fast.",
             "YOLO it on {ticker} before earnings, diamond hands, we are going to the moon.",
             "Leverage up on {ticker}, fortune favours the bold and the market only goes up."],
            ["Cancel {sub} and cook at home, every dollar you keep is a dollar earned.",
             "Buy used, skip {sub}, and stash the savings in a jar, frugal beats fancy.",
             "Track every coffee and drop {sub}, small savings add up to big freedom."]],
        "style_slots": {"n": ["three", "six", "nine"], "ticker": ["GME", "TSLA", "NVDA", "SPY"],
                        "sub": ["the gym", "streaming", "takeout", "the car lease"]},
    },
    "history": {
        "communities": ["AskHistorians", "HistoryMemes", "history", "AskEurope"],  # sourced, meme, story, sourced
        "titles": ["Why did {empire} fall so quickly?", "What was daily life like in {place} around {year}?",
                   "How did people in {place} react to {event}?", "Was {event} really as bad as they say?"],
        "bodies": ["I read a short article about {event} and it left me with more questions than answers.",
                   "My teacher said {empire} collapsed for one reason, but that sounds too simple.",
                   "I am visiting {place} next month and want to understand what happened there in {year}.", ""],
        "slots": {"empire": ["Rome", "the Aztec empire", "Byzantium", "the Mongol empire"],
                  "place": ["Paris", "Kyoto", "Cairo", "Venice", "Krakow"], "year": ["1348", "1666", "1789", "1918"],
                  "event": ["the plague", "the great fire", "the revolution", "the famine"]},
        "styles": [  # A: sourced, B: meme, C: story
            ["According to {scholar}, the primary sources point to several causes at once; see their monograph.",
             "The evidence from archives and letters suggests a slow process; {scholar} covers this in detail.",
             "Historians such as {scholar} argue from tax records and chronicles that the picture is complex."],
            ["Imagine being {figure} and thinking this would work lol, absolute meme material.",
             "{figure} really said hold my wine and speedran the collapse, classic.",
             "Nobody: absolutely nobody: {figure}: let us make it worse, peak comedy."],
            ["Picture the streets at dawn: a baker named {name} opens her shop while rumours spread.",
             "Think of {name}, a young clerk, watching the smoke rise and packing what he could carry.",
             "Imagine {name} walking home past shuttered shops, wondering if tomorrow would be the same."]],
        "style_slots": {"scholar": ["Braudel", "Hobsbawm", "Tuchman", "Ladurie"],
                        "figure": ["the emperor", "the king", "the general", "the pope"],
                        "name": ["Marie", "Jonas", "Aiko", "Tomasz"]},
    },
}

# The hard subset (``embedded:compred-minority``, not the demo's): the finance posts and its three comment styles, plus
# a fourth, the FIRE style (save most of the income, retire early). Four large communities disagree about the three
# finance styles as the demo's do (every pair of them won 2:2) and all rank FIRE last; a small one,
# r/financialindependence, ranks FIRE first: its preferred comments are the ones every other community ranks last.
# It has a sixth of a large community's training posts (about 4% of the pairs) and as many validation and test posts
# as the others; 2% of the training pairs' labels are flipped (``MINORITY_NOISE``; validation and test keep each
# community's true taste; with 5% or more the demo's tiny model no longer learns the small community's taste even
# from every pair, README.md "Measured on the hard subset"), posts are long (bodies of ~120 words, heavy-tailed),
# and only comments of different styles are paired. A model that applies the majority's taste to it ranks half of
# its pairs backwards.
SUBSETS["minority"] = {
    **SUBSETS["finance"],
    "communities": ["personalfinance", "wallstreetbets", "Frugal", "investing", "financialindependence"],
    "styles": [*SUBSETS["finance"]["styles"], [
        "Save {pct} of your income, live on the rest, and you can retire at {age} on index fund dividends.",
        "Chase financial independence: cut costs hard, invest {pct} of every paycheck, quit the rat race by {age}.",
        "Run the numbers on the four percent rule; at a {pct} savings rate you are free well before {age}."]],
    "style_slots": {**SUBSETS["finance"]["style_slots"], "pct": ["half", "sixty percent", "seventy percent"],
                    "age": ["40", "45", "50"]},
    "rankings": [(0, 2, 1, 3), (1, 2, 0, 3), (2, 1, 0, 3), (0, 1, 2, 3), (3, 0, 2, 1)],
    "scores": [(250, 500), (40, 120), (8, 20), (1, 4)],  # by rank: any two ranks apart by a score ratio of 2 or more
    "train_share": {"financialindependence": 1 / 6},
    "distinct_styles": True,
}


FILLER = ["I have been thinking about this for a while now.", "There are a few things worth keeping in mind here.",
           "It depends a lot on the details, of course.", "Some people will tell you otherwise, and that is fine.",
           "I went through something similar a few years ago.", "Take this with a grain of salt.",
           "The short version is that it is complicated.", "To be honest I was surprised when I first looked into it.",
           "Here is what I found after reading around.", "Edit: a few people asked me to add more detail.",
           "This is a longer story than it looks at first.", "My situation may be different from yours.",
           "Let me explain what I mean by that.", "Looking back, I would have done a few things differently.",
           "Nobody really talks about this part.", "I am not sure this is the right place to ask, but here goes."]
