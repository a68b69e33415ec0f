"""Countries and their capital cities, for factual-recall experiments.

Written by the project from general knowledge; not copied from any data set.

``capital`` is the canonical English name. ``variants`` holds other
spellings or names of the *same* city (ASCII forms without diacritics,
older romanisations); a second seat of government is never a variant.

Deliberately left out because "the capital" is ambiguous or disputed:
Bolivia (Sucre constitutional, La Paz seat of government), Benin (Porto-Novo
official, Cotonou seat of government), Cote d'Ivoire (Yamoussoukro official,
Abidjan de facto), Sri Lanka (Sri Jayawardenepura Kotte official, Colombo
commercial), Burundi (moved from Bujumbura to Gitega in 2019), Israel
(status of Jerusalem disputed), Nauru (no official capital), and states with
limited recognition (Palestine, Taiwan, Kosovo, ...).

City-states whose capital shares the country's name (Monaco, Singapore,
San Marino, Vatican City) are included; filter them out where a copied
answer would be trivial.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capital:
    """A country and its capital city."""

    country: str
    capital: str
    variants: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """All accepted names of the capital, canonical first."""
        return (self.capital, *self.variants)


# Written by the project.
CAPITALS: tuple[Capital, ...] = (
    # --- Europe ---
    Capital("Albania", "Tirana", ("Tirane",)),
    Capital("Andorra", "Andorra la Vella"),
    Capital("Armenia", "Yerevan", ("Erevan",)),
    Capital("Austria", "Vienna"),
    Capital("Azerbaijan", "Baku"),
    Capital("Belarus", "Minsk"),
    # Seat of the EU institutions too; unambiguous as Belgium's capital.
    Capital("Belgium", "Brussels"),
    Capital("Bosnia and Herzegovina", "Sarajevo"),
    Capital("Bulgaria", "Sofia"),
    Capital("Croatia", "Zagreb"),
    Capital("Cyprus", "Nicosia"),
    Capital("Czech Republic", "Prague"),
    Capital("Denmark", "Copenhagen"),
    Capital("Estonia", "Tallinn"),
    Capital("Finland", "Helsinki"),
    Capital("France", "Paris"),
    Capital("Georgia", "Tbilisi"),
    Capital("Germany", "Berlin"),
    Capital("Greece", "Athens"),
    Capital("Hungary", "Budapest"),
    Capital("Iceland", "Reykjavík", ("Reykjavik",)),
    Capital("Ireland", "Dublin"),
    Capital("Italy", "Rome"),
    Capital("Latvia", "Riga"),
    Capital("Liechtenstein", "Vaduz"),
    Capital("Lithuania", "Vilnius"),
    Capital("Luxembourg", "Luxembourg City", ("Luxembourg",)),
    Capital("Malta", "Valletta"),
    Capital("Moldova", "Chișinău", ("Chisinau", "Kishinev")),
    Capital("Monaco", "Monaco"),
    # Cetinje is the historic royal capital; Podgorica is the capital.
    Capital("Montenegro", "Podgorica"),
    # Amsterdam is the constitutional capital; the government sits in
    # The Hague, which is therefore not a variant.
    Capital("Netherlands", "Amsterdam"),
    Capital("North Macedonia", "Skopje"),
    Capital("Norway", "Oslo"),
    Capital("Poland", "Warsaw"),
    Capital("Portugal", "Lisbon"),
    Capital("Romania", "Bucharest"),
    Capital("Russia", "Moscow"),
    Capital("San Marino", "San Marino"),
    Capital("Serbia", "Belgrade"),
    Capital("Slovakia", "Bratislava"),
    Capital("Slovenia", "Ljubljana"),
    Capital("Spain", "Madrid"),
    Capital("Sweden", "Stockholm"),
    # Bern is officially the "federal city", universally given as the capital.
    Capital("Switzerland", "Bern", ("Berne",)),
    Capital("Turkey", "Ankara"),
    Capital("Ukraine", "Kyiv", ("Kiev",)),
    Capital("United Kingdom", "London"),
    Capital("Vatican City", "Vatican City"),
    # --- Asia and the Middle East ---
    Capital("Afghanistan", "Kabul"),
    Capital("Bahrain", "Manama"),
    Capital("Bangladesh", "Dhaka", ("Dacca",)),
    Capital("Bhutan", "Thimphu"),
    Capital("Brunei", "Bandar Seri Begawan"),
    Capital("Cambodia", "Phnom Penh"),
    Capital("China", "Beijing", ("Peking",)),
    Capital("India", "New Delhi"),
    # Nusantara is the planned future capital; Jakarta remains the capital.
    Capital("Indonesia", "Jakarta"),
    Capital("Iran", "Tehran", ("Teheran",)),
    Capital("Iraq", "Baghdad"),
    Capital("Japan", "Tokyo"),
    Capital("Jordan", "Amman"),
    # Named Nur-Sultan from 2019 to 2022; older text uses that name.
    Capital("Kazakhstan", "Astana", ("Nur-Sultan",)),
    Capital("Kuwait", "Kuwait City"),
    Capital("Kyrgyzstan", "Bishkek"),
    Capital("Laos", "Vientiane"),
    Capital("Lebanon", "Beirut"),
    # Putrajaya is the administrative centre; Kuala Lumpur is the capital.
    Capital("Malaysia", "Kuala Lumpur"),
    Capital("Maldives", "Malé", ("Male",)),
    Capital("Mongolia", "Ulaanbaatar", ("Ulan Bator",)),
    # Capital moved from Yangon (Rangoon) to Naypyidaw in 2005-2006.
    Capital("Myanmar", "Naypyidaw", ("Nay Pyi Taw", "Naypyitaw")),
    Capital("Nepal", "Kathmandu"),
    Capital("North Korea", "Pyongyang"),
    Capital("Oman", "Muscat"),
    Capital("Pakistan", "Islamabad"),
    Capital("Philippines", "Manila"),
    Capital("Qatar", "Doha"),
    Capital("Saudi Arabia", "Riyadh"),
    Capital("Singapore", "Singapore"),
    Capital("South Korea", "Seoul"),
    Capital("Syria", "Damascus"),
    Capital("Tajikistan", "Dushanbe"),
    Capital("Thailand", "Bangkok"),
    Capital("Timor-Leste", "Dili"),
    Capital("Turkmenistan", "Ashgabat", ("Ashkhabad",)),
    Capital("United Arab Emirates", "Abu Dhabi"),
    Capital("Uzbekistan", "Tashkent"),
    Capital("Vietnam", "Hanoi", ("Ha Noi",)),
    # Sanaa is the constitutional capital; the recognised government has
    # operated from Aden since 2015.
    Capital("Yemen", "Sanaa", ("Sana'a",)),
    # --- Africa ---
    Capital("Algeria", "Algiers"),
    Capital("Angola", "Luanda"),
    Capital("Botswana", "Gaborone"),
    Capital("Burkina Faso", "Ouagadougou"),
    Capital("Cameroon", "Yaoundé", ("Yaounde",)),
    Capital("Cape Verde", "Praia"),
    Capital("Central African Republic", "Bangui"),
    Capital("Chad", "N'Djamena", ("Ndjamena",)),
    Capital("Comoros", "Moroni"),
    Capital("Democratic Republic of the Congo", "Kinshasa"),
    Capital("Djibouti", "Djibouti City", ("Djibouti",)),
    Capital("Egypt", "Cairo"),
    # A move to Ciudad de la Paz is planned; Malabo is the capital.
    Capital("Equatorial Guinea", "Malabo"),
    Capital("Eritrea", "Asmara"),
    # Mbabane is the executive capital; Lobamba is the royal and
    # legislative capital (not a variant).
    Capital("Eswatini", "Mbabane"),
    Capital("Ethiopia", "Addis Ababa"),
    Capital("Gabon", "Libreville"),
    Capital("Gambia", "Banjul"),
    Capital("Ghana", "Accra"),
    Capital("Guinea", "Conakry"),
    Capital("Guinea-Bissau", "Bissau"),
    Capital("Kenya", "Nairobi"),
    Capital("Lesotho", "Maseru"),
    Capital("Liberia", "Monrovia"),
    Capital("Libya", "Tripoli"),
    Capital("Madagascar", "Antananarivo"),
    Capital("Malawi", "Lilongwe"),
    Capital("Mali", "Bamako"),
    Capital("Mauritania", "Nouakchott"),
    Capital("Mauritius", "Port Louis"),
    Capital("Morocco", "Rabat"),
    Capital("Mozambique", "Maputo"),
    Capital("Namibia", "Windhoek"),
    Capital("Niger", "Niamey"),
    Capital("Nigeria", "Abuja"),
    Capital("Republic of the Congo", "Brazzaville"),
    Capital("Rwanda", "Kigali"),
    Capital("São Tomé and Príncipe", "São Tomé", ("Sao Tome",)),
    Capital("Senegal", "Dakar"),
    Capital("Seychelles", "Victoria"),
    Capital("Sierra Leone", "Freetown"),
    Capital("Somalia", "Mogadishu"),
    # Pretoria is the executive capital, commonly given as "the capital";
    # Cape Town (legislative) and Bloemfontein (judicial) are not variants.
    Capital("South Africa", "Pretoria"),
    Capital("South Sudan", "Juba"),
    Capital("Sudan", "Khartoum"),
    # Dodoma is the official capital; Dar es Salaam is the largest city and
    # still hosts many government offices (not a variant).
    Capital("Tanzania", "Dodoma"),
    Capital("Togo", "Lomé", ("Lome",)),
    Capital("Tunisia", "Tunis"),
    Capital("Uganda", "Kampala"),
    Capital("Zambia", "Lusaka"),
    Capital("Zimbabwe", "Harare"),
    # --- The Americas and the Caribbean ---
    Capital("Antigua and Barbuda", "St. John's", ("Saint John's",)),
    Capital("Argentina", "Buenos Aires"),
    Capital("Bahamas", "Nassau"),
    Capital("Barbados", "Bridgetown"),
    Capital("Belize", "Belmopan"),
    Capital("Brazil", "Brasília", ("Brasilia",)),
    Capital("Canada", "Ottawa"),
    Capital("Chile", "Santiago", ("Santiago de Chile",)),
    Capital("Colombia", "Bogotá", ("Bogota",)),
    Capital("Costa Rica", "San José", ("San Jose",)),
    Capital("Cuba", "Havana", ("La Habana",)),
    Capital("Dominica", "Roseau"),
    Capital("Dominican Republic", "Santo Domingo"),
    Capital("Ecuador", "Quito"),
    Capital("El Salvador", "San Salvador"),
    Capital("Grenada", "St. George's", ("Saint George's",)),
    Capital("Guatemala", "Guatemala City"),
    Capital("Guyana", "Georgetown"),
    Capital("Haiti", "Port-au-Prince"),
    Capital("Honduras", "Tegucigalpa"),
    Capital("Jamaica", "Kingston"),
    Capital("Mexico", "Mexico City"),
    Capital("Nicaragua", "Managua"),
    Capital("Panama", "Panama City"),
    Capital("Paraguay", "Asunción", ("Asuncion",)),
    Capital("Peru", "Lima"),
    Capital("Saint Kitts and Nevis", "Basseterre"),
    Capital("Saint Lucia", "Castries"),
    Capital("Saint Vincent and the Grenadines", "Kingstown"),
    Capital("Suriname", "Paramaribo"),
    Capital("Trinidad and Tobago", "Port of Spain", ("Port-of-Spain",)),
    Capital(
        "United States",
        "Washington, D.C.",
        ("Washington", "Washington D.C.", "Washington DC"),
    ),
    Capital("Uruguay", "Montevideo"),
    Capital("Venezuela", "Caracas"),
    # --- Oceania ---
    Capital("Australia", "Canberra"),
    Capital("Fiji", "Suva"),
    Capital("Kiribati", "South Tarawa", ("Tarawa",)),
    Capital("Marshall Islands", "Majuro"),
    Capital("Micronesia", "Palikir"),
    Capital("New Zealand", "Wellington"),
    # Ngerulmud (in Melekeok State) replaced Koror in 2006.
    Capital("Palau", "Ngerulmud"),
    Capital("Papua New Guinea", "Port Moresby"),
    Capital("Samoa", "Apia"),
    Capital("Solomon Islands", "Honiara"),
    Capital("Tonga", "Nuku'alofa", ("Nukuʻalofa", "Nukualofa")),
    Capital("Tuvalu", "Funafuti"),
    Capital("Vanuatu", "Port Vila", ("Port-Vila",)),
)

_BY_COUNTRY: dict[str, Capital] = {c.country.casefold(): c for c in CAPITALS}


def capital_of(country: str) -> Capital:
    """Return the entry for ``country`` (case-insensitive); KeyError if absent."""
    try:
        return _BY_COUNTRY[country.strip().casefold()]
    except KeyError:
        raise KeyError(
            f"no capital recorded for country {country!r}; "
            f"{len(CAPITALS)} countries are listed in analyses.data.capitals.CAPITALS"
        ) from None
