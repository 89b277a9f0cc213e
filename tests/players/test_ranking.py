"""players.ranking is pure: nodes, measurements, the client's country and a country table in; (node, reason) out."""

from types import SimpleNamespace

from django.test import SimpleTestCase

from players import ranking

# Country centres as the countryinfo package has them (checked in test_the_real_table_*).
CENTRES = {"CN": (35.0, 105.0), "HK": (22.25, 114.16666666), "DE": (51.0, 9.0), "US": (38.0, -97.0)}
NAMES = {"CN": "China", "HK": "Hong Kong", "DE": "Germany", "US": "United States"}


class FakeCountries:
    def latlng(self, code):
        return CENTRES.get(code)

    def name(self, code):
        return NAMES.get(code, code)


def node(pk, name, country="", lat=None, lon=None):
    return SimpleNamespace(pk=pk, name=name, country=country, latitude=lat, longitude=lon)


HANGZHOU = node(1, "hangzhou", "CN", 30.27, 120.15)
HONGKONG = node(2, "hongkong", "HK")
FRANKFURT = node(3, "frankfurt", "DE", 50.11, 8.68)
NOWHERE = node(4, "nowhere")
NODES = [HANGZHOU, HONGKONG, FRANKFURT, NOWHERE]


def names(ranked):
    return [n.name for n, _ in ranked]


class MeasuredTests(SimpleTestCase):
    def test_browser_measurements_come_first_fastest_first(self):
        ranked = ranking.rank_nodes(NODES, rtts={1: 80.0, 2: 12.5, 3: 230.0}, client_country="CN",
                                    countries=FakeCountries())
        self.assertEqual(names(ranked)[:3], ["hongkong", "hangzhou", "frankfurt"])
        self.assertEqual(ranked[0][1], "12 ms from your browser")

    def test_a_node_that_did_not_answer_goes_after_the_measured_ones_and_says_so(self):
        ranked = ranking.rank_nodes(NODES, rtts={1: None, 2: 40.0}, client_country="CN",
                                    countries=FakeCountries())
        self.assertEqual(names(ranked)[:2], ["hongkong", "hangzhou"])
        self.assertTrue(ranked[1][1].startswith("did not answer your browser; in your country"))

    def test_every_node_appears_exactly_once(self):
        ranked = ranking.rank_nodes(NODES, rtts={3: 5.0})
        self.assertEqual(sorted(names(ranked)), sorted(n.name for n in NODES))

    def test_the_result_is_a_list_of_node_and_reason_pairs(self):
        ranked = ranking.rank_nodes([HANGZHOU], rtts={1: 3.0})
        self.assertEqual(ranked, [(HANGZHOU, "3 ms from your browser")])


class EstimatedTests(SimpleTestCase):
    def test_a_node_in_the_clients_country_comes_first(self):
        ranked = ranking.rank_nodes(NODES, client_country="HK", countries=FakeCountries())
        self.assertEqual(names(ranked)[0], "hongkong")
        self.assertEqual(ranked[0][1], "in your country (Hong Kong, going by your IP address)")

    def test_other_nodes_follow_by_distance_and_the_unplaced_one_comes_last(self):
        ranked = ranking.rank_nodes(NODES, client_country="US", countries=FakeCountries())
        self.assertEqual(names(ranked), ["frankfurt", "hangzhou", "hongkong", "nowhere"])
        self.assertIn("km from United States", ranked[0][1])
        self.assertTrue(ranked[-1][1].startswith("location unknown"))

    def test_a_nodes_own_coordinates_beat_its_country_centre(self):
        # Registered in Germany, but its coordinates say Lisbon: that is what counts, and Lisbon is nearer the US.
        lisbon_by_coords = node(5, "lisbon", "DE", 38.72, -9.14)
        ranked = ranking.rank_nodes([lisbon_by_coords, FRANKFURT], client_country="US", countries=FakeCountries())
        self.assertEqual(names(ranked), ["lisbon", "frankfurt"])

    def test_an_unknown_client_country_falls_back_to_the_default_node(self):
        ranked = ranking.rank_nodes(NODES, client_country=None, countries=FakeCountries(), default_node_id=3)
        self.assertEqual(names(ranked), ["frankfurt", "hangzhou", "hongkong", "nowhere"])
        self.assertEqual(ranked[0][1], "the host's default server")
        self.assertEqual(ranked[1][1], "in the order the host added servers")

    def test_a_country_missing_from_the_table_falls_back_too(self):
        ranked = ranking.rank_nodes(NODES, client_country="ZZ", countries=FakeCountries())
        self.assertEqual(names(ranked), ["hangzhou", "hongkong", "frankfurt", "nowhere"])

    def test_without_any_evidence_the_order_is_creation_order(self):
        self.assertEqual(names(ranking.rank_nodes(NODES)), ["hangzhou", "hongkong", "frankfurt", "nowhere"])

    def test_no_nodes_rank_to_an_empty_list(self):
        self.assertEqual(ranking.rank_nodes([], rtts={1: 3.0}, client_country="CN", countries=FakeCountries()), [])


class DistanceTests(SimpleTestCase):
    def test_hong_kong_to_hangzhou_is_about_1100_km(self):
        km = ranking.distance_km((22.32, 114.17), (30.27, 120.15))
        self.assertAlmostEqual(km, 1070, delta=40)

    def test_the_distance_to_itself_is_zero(self):
        self.assertEqual(ranking.distance_km((10.0, 20.0), (10.0, 20.0)), 0.0)


class RealLookupTests(SimpleTestCase):
    def test_the_real_table_has_the_centres_these_tests_use(self):
        table = ranking.CountryTable.load()
        for code, centre in CENTRES.items():
            self.assertEqual(table.latlng(code), centre)
            self.assertEqual(table.name(code), NAMES[code])
        self.assertIsNone(table.latlng("ZZ"))

    def test_geoip_finds_a_public_address_and_ignores_private_or_malformed_ones(self):
        self.assertEqual(ranking.country_of("8.8.8.8"), "US")
        self.assertIsNone(ranking.country_of("127.0.0.1"))
        self.assertIsNone(ranking.country_of("10.1.2.3"))
        self.assertIsNone(ranking.country_of("not an address"))
        self.assertIsNone(ranking.country_of(None))

    def test_a_lookup_can_be_passed_in(self):
        self.assertEqual(ranking.country_of("192.0.2.1", lookup=lambda ip: "HK"), "HK")
