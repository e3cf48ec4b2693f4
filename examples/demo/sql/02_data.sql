-- Reference data lives in its own file, pulled in relative to this one.
\ir data/languages.sql

INSERT INTO film (title, release_year, language_id, rental_rate, length_minutes)
SELECT 'Film #' || g,
       1950 + (g % 70),
       1 + (g % 4),
       round((0.99 + (g % 5)), 2),
       80 + (g % 60)
FROM generate_series(1, 1000) AS g;

INSERT INTO rental (film_id, rented_at)
SELECT 1 + (g % 1000), timestamptz '2024-01-01' + g * interval '17 minutes'
FROM generate_series(1, 5000) AS g;
